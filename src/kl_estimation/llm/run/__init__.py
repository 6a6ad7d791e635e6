"""The run layer of an LLM experiment: settings (config), units of work and their random streams (units), the run
folder and its resumable files (store), per-prompt and prompt-set estimates (aggregate), the loop that ties them
together (runner), and data parallelism under torchrun (distributed)."""
