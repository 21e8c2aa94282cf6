"""ZipIt, permute and RegMean for Llama-style decoders: the layer forward that gathers
activation statistics (forward.py), the matching of features (match.py), and the rewriting
of each tensor from the matches (apply.py)."""
