"""Input and output: atomic folders, manifests and the Hugging Face Hub."""
