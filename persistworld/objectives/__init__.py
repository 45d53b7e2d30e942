"""Training objectives. Each returns PER-SAMPLE values (a dict with ``loss`` (N,)); trainers
reduce. They share one signature, ``term(x0_theta, Samples) -> dict`` (``terms``): ``nft`` (the
RL post-training loss) or ``rwr`` in post-training, plus ``kl``; ``denoising`` in base
training (``denoising_loss`` is its forward pass)."""
from persistworld.objectives.denoising import denoising_loss, draw_noise, noised_history
from persistworld.objectives.terms import (NFT, RWR, Denoising, KLToBase, Samples, Term,
                                           post_training_term)

__all__ = ["denoising_loss", "draw_noise", "noised_history", "NFT", "RWR", "Denoising",
           "KLToBase", "Samples", "Term", "post_training_term"]
