"""The steering hook: applies an edit of :mod:`saealign.steering.edits` inside a model, and records per token.

:class:`SteeringHook` is a forward hook on one decoder block; :func:`steer` attaches one for the duration of a
``with`` block and always removes it. The decoding loop (:mod:`saealign.steering.decoding`) attaches its hook
around each forward call instead, so a stream left half read never leaves a hook on the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from saealign.errors import SaealignError
from saealign.sae.autoencoder import SAE
from saealign.steering.edits import Steering, apply_edit, rowwise
from saealign.steering.feedback import TopicFeedback
from saealign.steering.spec import ADDITIVE, PUSH_ONLY


def _with_hidden(output: object, hidden: Tensor) -> object:
    """``output`` with its hidden states replaced, in the same structure (Tensor or tuple)."""
    if isinstance(output, Tensor):
        return hidden
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return (hidden, *output[1:])
    raise SaealignError(
        f"the hooked block returned {type(output).__name__}: expected a Tensor or a tuple starting with one"
    )


class SteeringHook:
    """A forward hook that edits a block's output and records per-token contamination.

    Every call records ``[batch, seq]`` tensors, so a generation with a KV cache records the prompt
    positions on its first call and one position per later call (the last generated token is never
    fed back, so a run of N new tokens records prompt + N − 1 positions). Padding positions are
    edited and recorded like any other: the hook cannot see the attention mask, so slice with it,
    or set :attr:`keep`.
    """

    def __init__(
        self,
        sae: SAE,
        steering: Steering,
        scores: Tensor,
        max_act: Tensor | None = None,
        record: bool = True,
        weights: Tensor | None = None,
        direction: Tensor | None = None,
        feedback: TopicFeedback | None = None,
    ) -> None:
        if feedback is not None and direction is None:
            raise SaealignError("the topic feedback fades an additive push: it needs a direction")
        if steering.method in ADDITIVE and (direction is None or direction.shape[-1] != sae.d_in):
            raise SaealignError(f"{steering.method} needs a topic direction of {sae.d_in} values per row")
        if weights is not None and weights.shape != scores.shape:
            raise SaealignError(f"weights of shape {tuple(weights.shape)} must match scores {tuple(scores.shape)}")
        if scores.dim() not in (1, 2) or scores.shape[-1] != sae.d_sae:
            raise SaealignError(
                f"scores of shape {tuple(scores.shape)} do not fit an SAE of {sae.d_sae} latents: "
                "pass [d_sae] or [batch, d_sae]"
            )
        if scores.numel() and not (scores.min() >= 0 and scores.max() <= 1):
            raise SaealignError("scores must lie in [0, 1] (1 = aligned): pass the scores M1 produced")
        if steering.method == "clamp" and max_act is None:
            raise SaealignError("clamp needs max_act (each latent's max activation over the reference set)")
        self.sae = sae
        self.steering = steering
        self.scores = scores
        self.max_act = max_act
        self.weights = weights
        """Swap/Weight weights overriding ``steering.weights(scores)`` (per-row strengths), or None."""
        self.direction = direction
        """What the additive methods add (``[d_in]`` or ``[batch, d_in]``, scaled), or None."""
        self.feedback = feedback
        """Fades :attr:`direction` per row as the generated text turns to the topic
        (:mod:`saealign.steering.feedback`), or None: the push stays constant."""
        self.record = record
        self.contamination: list[Tensor] = []
        """One ``[batch, seq]`` float32 tensor per forward call."""
        self.n_changed: list[Tensor] = []
        """One ``[batch, seq]`` int64 tensor per forward call."""
        self.n_active: list[Tensor] = []
        """One ``[batch, seq]`` int64 tensor per forward call (0 = contamination defined as 0)."""
        self.push_scale = 1.0
        """Multiplies :attr:`direction` in the next forward call (the prompt pass's ``prompt_boost``); set it before
        the call, reset it to 1 after."""
        self.slot_vectors: Tensor | None = None
        """``[batch, d_in]``: what the concept slot adds at each row's placeholder (:mod:`saealign.steering.slot`), or
        None (no slot)."""
        self.slot_mask: Tensor | None = None
        """bool ``[batch, seq]`` of the next forward call, or None: the positions that take :attr:`slot_vectors` (each
        slotted row's placeholder in the prompt pass). Set it before the call, clear it after."""
        self.keep: Tensor | None = None
        """bool ``[batch, seq]`` of the next forward call, or None: positions passed through unedited,
        recorded with contamination, n_changed and n_active 0. Set it before the call, clear it after.
        Generation keeps each sequence's first real position (the SAE never saw it in training or
        indexing: its residual norm is 10-100x the others, so a reconstruction wrecks the text) and
        the padding."""

    def __call__(self, module: nn.Module, args: object, output: object) -> object | None:
        if self.steering.method == "none" and not self.record:
            return None  # nothing to change and nothing to measure: skip the SAE entirely
        hidden = output if isinstance(output, Tensor) else output[0]  # type: ignore[index]
        direction = self.direction
        if direction is not None and self.push_scale != 1.0:
            direction = direction * self.push_scale
        if self.feedback is not None and direction is not None:
            with torch.no_grad():
                acts = self.sae.activate(self.sae.pre(hidden))
            rows = direction.expand(hidden.shape[0], -1) if direction.dim() == 1 else direction
            keep = None if self.keep is None else self.keep.to(hidden.device)
            direction = rows * self.feedback.scale(acts, keep).to(rows.device, rows.dtype)
        if self.steering.method in PUSH_ONLY and not self.record and direction is not None:
            # a push that measures nothing (a companion layer): x + v, the SAE never runs (apply_edit's arithmetic)
            pushed = hidden + rowwise(direction.to(hidden.device), hidden).to(hidden.dtype)
            return _with_hidden(output, self._slotted(self._kept(hidden, pushed)))
        res = apply_edit(self.sae, hidden, self.steering, self.scores, self.max_act, self.weights, direction)
        out, contam, n_changed, n_active = res.out, res.contamination, res.n_changed, res.n_active
        if self.keep is not None:
            keep = self.keep.to(hidden.device)
            out = self._kept(hidden, out)
            contam = contam.masked_fill(keep, 0)
            n_changed = n_changed.masked_fill(keep, 0)
            n_active = n_active.masked_fill(keep, 0)
        if self.record:
            self.contamination.append(contam)
            self.n_changed.append(n_changed)
            self.n_active.append(n_active)
        if self.steering.method == "none":
            return None
        return _with_hidden(output, self._slotted(out))

    def _slotted(self, out: Tensor) -> Tensor:
        """``out`` with :attr:`slot_vectors` added at the :attr:`slot_mask` positions (``out`` itself without them)."""
        if self.slot_mask is None or self.slot_vectors is None:
            return out
        mask = self.slot_mask.to(out.device)
        if mask.shape != out.shape[:-1] or self.slot_vectors.shape != (out.shape[0], out.shape[-1]):
            raise SaealignError(
                f"the slot covers {tuple(mask.shape)} positions of {tuple(self.slot_vectors.shape)} vectors but the block "
                f"output is {tuple(out.shape)}: set slot_mask for the prompt pass only, then clear it"
            )
        return out + mask.unsqueeze(-1).to(out.dtype) * self.slot_vectors.to(out.device, out.dtype).unsqueeze(1)

    def _kept(self, hidden: Tensor, out: Tensor) -> Tensor:
        """``out`` with the :attr:`keep` positions put back to ``hidden`` (``out`` itself when keep is None)."""
        if self.keep is None:
            return out
        keep = self.keep.to(hidden.device)
        if keep.shape != hidden.shape[:-1]:
            raise SaealignError(
                f"keep has shape {tuple(keep.shape)} but the block output is {tuple(hidden.shape[:-1])} "
                "tokens: set keep for this forward call only, then clear it"
            )
        return torch.where(keep.unsqueeze(-1), hidden, out)

    def register(self, module: nn.Module) -> RemovableHandle:
        """Attach to ``module`` (a decoder block); remove with the returned handle.

        Prepended, so hooks already on the block (HF's ``output_hidden_states`` capture, other
        tools' probes) see the steered output, as if the block itself had computed it.
        """
        return module.register_forward_hook(self, prepend=True)

    def clear(self) -> None:
        """Forget what was recorded (e.g. between generations)."""
        self.contamination.clear()
        self.n_changed.clear()
        self.n_active.clear()

    @staticmethod
    def _cat(parts: list[Tensor]) -> Tensor:
        if not parts:
            raise SaealignError("nothing recorded: run the model inside the steer() block with record=True")
        if len({p.shape[0] for p in parts}) > 1:
            raise SaealignError("recorded calls have different batch sizes: clear() between runs")
        return torch.cat(parts, dim=1)

    def contamination_per_token(self) -> Tensor:
        """``[batch, positions]`` every recorded position, in order (padding included)."""
        return self._cat(self.contamination)

    def n_changed_per_token(self) -> Tensor:
        """``[batch, positions]`` latents changed per recorded position."""
        return self._cat(self.n_changed)

    def n_active_per_token(self) -> Tensor:
        """``[batch, positions]`` active latents of a' per recorded position."""
        return self._cat(self.n_active)


@contextlib.contextmanager
def steer(
    model: nn.Module,
    layer_module: nn.Module,
    sae: SAE,
    steering: Steering,
    scores: Tensor,
    max_act: Tensor | None = None,
    record: bool = True,
) -> Iterator[SteeringHook]:
    """Steer ``model`` at ``layer_module`` (see :func:`saealign.residual_stream.layer_module`) inside the block.

    ``with steer(model, layer_module(model, 6), sae, Steering("swap"), scores) as hook: model.generate(...)``
    The hook is removed when the block ends, also on an exception; the model's modules are never
    replaced or changed. The edit runs without autograd.
    """
    if not any(m is layer_module for m in model.modules()):
        raise SaealignError("layer_module is not a module of this model: pass layer_module(model, L)")
    hook = SteeringHook(sae, steering, scores, max_act, record)
    handle = hook.register(layer_module)
    try:
        yield hook
    finally:
        handle.remove()
