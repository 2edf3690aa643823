"""Built-in environment families; importing this package registers them all."""

from openk2.rl.envs import arithmetic, code, instruction, lookup, math, puzzles, safety, tool_use  # noqa: F401
