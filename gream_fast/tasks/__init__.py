"""Alignment tasks, reasoning CoT synthesis and curriculum, chat formatting.

Import the modules you need (e.g. `gream_fast.tasks.llm_client`); nothing heavy is imported here.
"""
