"""Drop-ins for other libraries' losses, computed by mmkernels' kernels.

Each submodule imports its library (an optional dependency) when it is
imported itself; ``import mmkernels`` imports none of them.

- :mod:`mmkernels.integrations.sentence_transformers`: ``MultipleNegativesRankingLoss``,
  ``CachedMultipleNegativesRankingLoss``
- :mod:`mmkernels.integrations.transformers`: ``clip_loss``, ``siglip_loss``
  (CLIPModel, SiglipModel; it needs no import of transformers: it calls the model's methods)
- :mod:`mmkernels.integrations.open_clip`: ``patch``, ``unpatch``, ``is_patched``
  (``open_clip.create_loss`` builds mmkernels' ``ClipLoss`` / ``SigLipLoss``)
- :mod:`mmkernels.integrations.open_clip_train`: ``python -m`` it to run open_clip's
  trainer patched (it imports open_clip only when run)
"""
