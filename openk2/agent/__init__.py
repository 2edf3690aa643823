"""`openk2 agent`: a tool-using agent loop against any OpenAI-compatible endpoint (layer 5)."""

from openk2.agent.loop import Agent, AgentBudget, AgentState

__all__ = ["Agent", "AgentBudget", "AgentState"]
