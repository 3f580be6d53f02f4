"""kvpress's own rule for Gemma 3, for every hybrid model: compress only the layers without a window.

kvpress's ``BasePress.__call__`` skips the sliding-window layers of ``Gemma3ForConditionalGeneration`` ("Compression
in Gemma3 is only applied to layer without sliding window attention"), but not those of ``Gemma3ForCausalLM``
(Gemma-3-270M, Gemma-3-1B), whose windowed layers it then compresses as if they were full: SnapKV scores 0 on
Gemma-3-270M that way (README). :class:`FullLayersOnly` runs a kvpress press as kvpress means it to run on a hybrid
model, so that the study compares ComposePress with kvpress's presses on equal terms; on a model without windowed
layers it is the press itself.

Its compressed layers then hold fewer entries than the windowed ones, and transformers builds one attention mask
for all layers (a question pass after the prefill fails on the size mismatch, as kvpress's own ``KVComposePress``
does). So each layer it compresses is marked as ComposePress marks its own, and ComposePress's per-layer mask hooks
(:mod:`kvpress_compose.layer_masks`) give it its mask; the tests check the logits against the masked reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpress import BasePress

from kvpress_compose.compression import mark_compressed, processed_positions
from kvpress_compose.layer_masks import install_layer_mask_hooks, layer_windows
from kvpress_compose.model_attachment import language_model_of


@dataclass
class FullLayersOnly(BasePress):
    """``press`` (a kvpress press that compresses in its forward hook, e.g. SnapKV, Knorm, TOVA, AdaKV), applied to
    the full-attention layers of a model that has windowed ones; every layer where no layer is windowed, and also
    where every layer is (Mistral's ``sliding_window``: as kvpress does, with no check that the context fits the
    window, which ComposePress makes).

    Parameters
    ----------
    press : BasePress
        The press to run; its ``compression_ratio`` is this press's.
    """

    press: BasePress

    @property
    def compression_ratio(self) -> float:
        return self.press.compression_ratio

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        self.press.compression_ratio = value

    def post_init_from_model(self, model):
        self.press.post_init_from_model(model)
        language_model = language_model_of(model)
        install_layer_mask_hooks(language_model, [layer.self_attn for layer in language_model.layers])

    def forward_hook(self, module, input, kwargs, output):
        windows = layer_windows(module.config, module.config.num_hidden_layers)
        if None not in windows or all(window is None for window in windows):  # no hybrid: the press itself
            return self.press.forward_hook(module, input, kwargs, output)
        if windows[module.layer_idx] is not None:  # a windowed layer of a hybrid model
            return output
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        processed = processed_positions(layer)
        output = self.press.forward_hook(module, input, kwargs, output)
        if layer.get_seq_length() < processed:  # compressed: its own length, which its mask must follow
            mark_compressed(layer, layer.get_seq_length(), processed)
        return output
