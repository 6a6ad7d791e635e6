"""The shared core, used by every area: the proposal registry, estimators as array functions, weight diagnostics,
ways of drawing tokens (draws/), exact values, random streams and the checks of settings. numpy first; the same
functions take torch tensors (array-API style)."""
