"""Training objectives. Each returns PER-SAMPLE values (a dict with ``loss`` (N,)); trainers
reduce. ``denoising`` is base training's EDM loss; ``nft`` is the RL post-training loss."""
from persistworld.objectives.denoising import denoising_loss, draw_noise, noised_history

__all__ = ["denoising_loss", "draw_noise", "noised_history"]
