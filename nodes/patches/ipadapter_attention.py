"""IP-Adapter as a model patch: diffusers' IP-Adapter attention processors on the UNet's
cross-attention layers, for one sampling run.

An IP-Adapter adds, to every cross-attention layer, a second attention over a few "image tokens"
projected from a CLIP vision embedding of the reference: out = attn(q, text) + weight *
attn(q, image). diffusers has the pieces (IPAdapterAttnProcessor2_0, the UNet's "ip_image_proj"
path); IPAdapterPatch puts them on the shared UNet for one sampling run and takes them off again,
and feeds the image embeddings per UNet call: the reference's for positive rows, the
unconditional ones for negative rows. Several IP-Adapters on one model are refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from plinth.nodes.core.context import ModelHandle, NodeContext, NodeInputError
from plinth.nodes.models.ipadapter import IPAdapterWeights
from plinth.nodes.patches.model_patch import Progress


@dataclass
class _Active:
    processors: list[Any]
    positive: torch.Tensor
    negative: torch.Tensor


@dataclass(eq=False)
class IPAdapterPatch:
    """An IP-Adapter on a MODEL: the image features of the reference (`positive`) and of the
    unconditional side (`negative`), one entry per reference image, and when it acts."""

    adapter: ModelHandle
    positive: torch.Tensor
    negative: torch.Tensor
    weight: float
    start_at: float
    end_at: float
    _active: _Active | None = field(default=None, init=False, repr=False)

    @contextmanager
    def applied(self, ctx: NodeContext, unet: torch.nn.Module) -> Iterator[None]:
        """IP-Adapter processors on the cross-attention layers and the image projection as the
        UNet's encoder_hid_proj for one run; the UNet is shared, so everything is put back."""
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        if unet.encoder_hid_proj is not None:
            raise NodeInputError(
                "the model already has an image projection (another IP-Adapter); "
                "Plinth applies one IP-Adapter per model"
            )
        adapter: IPAdapterWeights = ctx.model(self.adapter)
        layers = adapter.matching_layers(unet)
        param = next(unet.parameters())
        processors = []
        for _, k, v in layers:
            with torch.device("meta"):
                processor = IPAdapterAttnProcessor2_0(k.shape[0], k.shape[1], scale=self.weight)
            processor.load_state_dict(
                {
                    "to_k_ip.0.weight": k.to(param.device, param.dtype),
                    "to_v_ip.0.weight": v.to(param.device, param.dtype),
                },
                assign=True,
            )
            processors.append(processor)
        saved = [(attn, attn.processor) for attn, _, _ in layers]
        hid_dim_type = unet.config.encoder_hid_dim_type
        try:
            for (attn, _), processor in zip(saved, processors, strict=False):
                attn.set_processor(processor)
            unet.encoder_hid_proj = MultiIPAdapterImageProjection([adapter.image_proj.to(param.device, param.dtype)])
            unet.config.encoder_hid_dim_type = "ip_image_proj"  # an attribute, as diffusers sets it
            self._active = _Active(
                processors, self.positive.to(param.device, param.dtype), self.negative.to(param.device, param.dtype)
            )
            yield
        finally:
            self._active = None
            for attn, processor in saved:
                attn.set_processor(processor)
            del unet.encoder_hid_proj  # back to the plain None attribute the UNet was built with
            unet.encoder_hid_proj = None
            unet.config.encoder_hid_dim_type = hid_dim_type

    def call_kwargs(self, ctx: NodeContext, positive_rows: Sequence[bool], progress: Progress) -> dict[str, Any]:
        """The image features for each batch row; outside start_at..end_at the processors' scale
        is 0, which diffusers' processor skips, so those steps are exactly the plain model's."""
        if self._active is None:
            raise RuntimeError("IPAdapterPatch.call_kwargs outside applied()")
        scale = self.weight if progress.within(self.start_at, self.end_at) else 0.0
        for processor in self._active.processors:
            processor.scale = [scale]
        rows = [self._active.positive if positive else self._active.negative for positive in positive_rows]
        return {"added_cond_kwargs": {"image_embeds": [torch.stack(rows)]}}
