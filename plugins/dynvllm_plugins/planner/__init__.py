"""Planner connectors shipped with dynvllm."""
