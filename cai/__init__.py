"""The method as typed pure functions: conversations, keys, judge arithmetic, gates, rows, cards.

Nothing here opens a database session, starts Prefect, renders to a terminal or plots:
`flows/` wires these functions to the store and the engines, and tests call them directly.
"""
