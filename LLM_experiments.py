"""KL between two causal LMs (not implemented yet)."""
import sys

from kl_estimation.cli import not_implemented_main

if __name__ == "__main__":
    sys.exit(not_implemented_main("LLM_experiments.py"))
