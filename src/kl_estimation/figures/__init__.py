"""Figures drawn from saved run folders only: synthetic and sequence runs (synthetic.py), LLM runs (llm.py)."""
