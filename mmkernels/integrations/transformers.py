r"""Hugging Face transformers' CLIPModel and SiglipModel losses, computed without
the N x N logits that ``model(..., return_loss=True)`` forms.

    from mmkernels.integrations.transformers import clip_loss, siglip_loss
    loss = clip_loss(model, input_ids, pixel_values, attention_mask)
    # the value and gradients of model(..., return_loss=True).loss
    loss.backward()

Maths (transformers 5.25's CLIPModel.forward and SiglipModel.forward)
---------------------------------------------------------------------
With ``x = model.get_image_features(...)`` and ``y = model.get_text_features(...)``,
(N, D) each, ``xh = x / ||x||`` and ``yh = y / ||y||`` per row, and the logits
``L[t, i] = exp(logit_scale) * <yh_t, xh_i>`` (``logits_per_text``, (N, N)):

- CLIP: ``(F.cross_entropy(L, arange(N)) + F.cross_entropy(L.T, arange(N))) / 2``,
  which is :func:`mmkernels.contrastive_loss` with ``normalize=True`` and the
  multiplier ``exp(logit_scale)``.
- SigLIP: with ``z = +1`` on the diagonal and -1 elsewhere,
  ``mean_t sum_i -logsigmoid(z[t, i] * (L[t, i] + logit_bias))``, which is
  :func:`mmkernels.siglip_loss` with the texts as rows, ``normalize=True``,
  ``exp(logit_scale)`` and ``logit_bias``.

The parameters ``logit_scale`` (and ``logit_bias``) enter through autograd,
so they receive their gradients as in the model's own loss. The one
difference: the model divides by the norm itself, mmkernels by
``max(norm, 1e-12)``, which differs only for an all-zero feature (NaN there).

This module does not import transformers: it calls the model's methods.
"""

from __future__ import annotations

import inspect

from torch import Tensor

from mmkernels.ops import contrastive_loss as _contrastive_loss
from mmkernels.ops import siglip_loss as _siglip_loss

# Options fixed by the model's loss: the model normalizes, and the scale and bias
# are its parameters (passing them would drop the parameters' gradients).
_OWNED = ("normalize", "logit_scale", "logit_bias")


def _check_options(loss_fn, loss_options: dict) -> None:
    """Refuse, before the towers run, the options the model fixes and any name
    ``loss_fn`` does not take (its keyword-only arguments are the options)."""
    for name in _OWNED:
        if name in loss_options:
            raise TypeError(f"{name}: set from the model (its loss normalizes the features and "
                            f"uses model.logit_scale / model.logit_bias); do not pass it")
    accepted = [name for name, p in inspect.signature(loss_fn).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _OWNED]
    for name in loss_options:
        if name not in accepted:
            raise TypeError(f"{name}: not an option of mmkernels.{loss_fn.__name__} "
                            f"(accepted: {', '.join(accepted)})")


def _check_model(model, parameters: tuple[str, ...]) -> None:
    for name in ("get_image_features", "get_text_features") + parameters:
        if not hasattr(model, name):
            raise TypeError(f"model: expected a transformers model with get_image_features, "
                            f"get_text_features and {' and '.join(parameters)} (CLIPModel or "
                            f"SiglipModel), got {type(model).__name__} without {name}")


def _pooled(output, method: str) -> Tensor:
    """The (N, D) features from what ``model.<method>`` returned.

    transformers 4.x returns the tensor; 5.x a BaseModelOutputWithPooling whose
    ``pooler_output`` is the features (projected, for CLIP), or its
    ``to_tuple()`` when ``config.return_dict`` is False: (last_hidden_state,
    pooler_output, ...), neither of them ever None.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple) and len(output) >= 2 and isinstance(output[1], Tensor):
        return output[1]
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    raise TypeError(f"model.{method} returned {type(output).__name__}: expected a tensor or a "
                    f"model output with pooler_output")


def _features(model, input_ids, pixel_values, attention_mask, position_ids,
              interpolate_pos_encoding) -> tuple[Tensor, Tensor]:
    """(image features, text features), as the model's forward computes them,
    both on the text features' device (where its forward puts the logits)."""
    # Passed only when set, for versions whose methods lack the argument.
    image_kwargs = {"interpolate_pos_encoding": True} if interpolate_pos_encoding else {}
    text_kwargs = {} if position_ids is None else {"position_ids": position_ids}
    image = _pooled(model.get_image_features(pixel_values=pixel_values, **image_kwargs),
                    "get_image_features")
    text = _pooled(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask,
                                           **text_kwargs), "get_text_features")
    return image.to(text.device), text


def clip_loss(model, input_ids: Tensor, pixel_values: Tensor, attention_mask: Tensor | None = None,
              *, position_ids: Tensor | None = None, interpolate_pos_encoding: bool = False,
              **loss_options) -> Tensor:
    """``model(input_ids=..., pixel_values=..., attention_mask=..., return_loss=True).loss``
    of a transformers ``CLIPModel``, without the N x N logits.

    Args:
        model: a ``CLIPModel`` (any model with ``get_image_features``,
            ``get_text_features`` and a ``logit_scale`` parameter, the log of
            the multiplier, whose loss is CLIP's).
        input_ids, pixel_values, attention_mask, position_ids,
            interpolate_pos_encoding: as for the model's forward.
        **loss_options: keyword options of :func:`mmkernels.contrastive_loss`
            (``backend``, ``reduction``, ``label_smoothing``,
            ``false_negative_margin``); their defaults give the model's loss.
            ``normalize``, ``logit_scale`` and ``logit_bias`` are fixed by the
            model: passing them raises ``TypeError``, as does an unknown name.

    Returns:
        The loss, fp32 (fp64 for an fp64 model); gradients reach every
        parameter the model's own loss reaches, ``logit_scale`` included.
    """
    _check_model(model, ("logit_scale",))
    _check_options(_contrastive_loss, loss_options)
    image, text = _features(model, input_ids, pixel_values, attention_mask, position_ids,
                            interpolate_pos_encoding)
    scale = model.logit_scale.to(text.device).exp()
    return _contrastive_loss(image, text, scale, normalize=True, **loss_options)


def siglip_loss(model, input_ids: Tensor, pixel_values: Tensor,
                attention_mask: Tensor | None = None, *, position_ids: Tensor | None = None,
                interpolate_pos_encoding: bool = False, **loss_options) -> Tensor:
    """``model(input_ids=..., pixel_values=..., attention_mask=..., return_loss=True).loss``
    of a transformers ``SiglipModel``, without the N x N logits.

    Args:
        model: a ``SiglipModel`` (any model with ``get_image_features``,
            ``get_text_features`` and ``logit_scale`` / ``logit_bias``
            parameters whose loss is SigLIP's).
        input_ids, pixel_values, attention_mask, position_ids,
            interpolate_pos_encoding: as for the model's forward.
        **loss_options: keyword options of :func:`mmkernels.siglip_loss`
            (``backend``, ``reduction``); ``reduction="none"`` gives the (N,)
            per-text losses (the model's ``nll`` before its mean).
            ``normalize``, ``logit_scale`` and ``logit_bias`` are fixed by the
            model: passing them raises ``TypeError``, as does an unknown name.

    Returns:
        The loss, fp32 (fp64 for an fp64 model); gradients reach every
        parameter the model's own loss reaches, ``logit_scale`` and
        ``logit_bias`` included.
    """
    _check_model(model, ("logit_scale", "logit_bias"))
    _check_options(_siglip_loss, loss_options)
    image, text = _features(model, input_ids, pixel_values, attention_mask, position_ids,
                            interpolate_pos_encoding)
    scale = model.logit_scale.to(text.device).exp()
    bias = model.logit_bias.to(text.device)
    # Texts as rows, as the model's logits_per_text: reduction="none" is its per-text nll.
    return _siglip_loss(text, image, scale, bias, normalize=True, **loss_options)
