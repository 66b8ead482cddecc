"""Layer 2: thin KFP components that translate artifacts and parameters into step calls."""
