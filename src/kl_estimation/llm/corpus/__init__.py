"""Teacher-forced KL over a text corpus, the way quantization users measure it (llama.cpp's perplexity tool):
llama.cpp's windows and statistics (stats.py), with clustered standard errors and both directions."""
