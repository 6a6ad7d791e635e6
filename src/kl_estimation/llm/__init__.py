"""Language-model pairs: the sampling engine, the pair at run time (pair.py), loading models (loading.py), prompt
sets, the offline default pair, enumeration ground truth, and the run layer (run/)."""
