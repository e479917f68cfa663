"""JIIO tasks on scikit-learn's digits: latent-code optimisation for inverse problems (denoising, inpainting) with a
DEQ decoder, adversarial perturbations of a DEQ classifier, and the nested-optimisation baseline
(:mod:`integrations.jiio.tasks`); the command ``python -m integrations.jiio demo``
(:mod:`integrations.jiio.commands`)."""
