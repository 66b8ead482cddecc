"""Layer 1: the pipeline's step logic as plain, typed functions that know nothing of KFP."""
