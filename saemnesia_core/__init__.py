"""SAEmnesia core: TopK sparse autoencoders, the SAE file, and concept erasure. Never imports ComfyUI."""

__version__ = "0.1.0"
