"""The page's words of help: one line under each control (``INFO``, Gradio's ``info=``) and a
short glossary of the terms the controls use."""

from __future__ import annotations

INFO = {
    "model": "A Hugging Face hub name or a local folder; loads once and is shared by all tabs.",
    "admin_token": (
        "This public server writes to the store (extraction, the assistant axis) only for its "
        "owner: the token set in PERSONACHAT_ADMIN_TOKEN."
    ),
    "vectors_from": (
        "Which stored persona vectors steer: read from the question span (the user turn and "
        "the assistant header), the last prompt token, or the reply's average."
    ),
    "personas": "The personas to add to the model's residual stream. Empty: no steering.",
    "weight": "How much of this persona: 1 as is, 0 none, negative steers away from it.",
    "weights": "Typed weights: '1, -0.5' in the order picked, or 'pirate=1, cynic=-0.5'.",
    "preset": (
        "Which layers steer: the persona's best layer (highest AUC), a band of 2 layers either "
        "side of it, all layers, or custom (the spec below)."
    ),
    "layer_spec": (
        "Layer or range : strength, e.g. '2-3:3, 5:1' or 'all:2'; a bare layer ('2-3') takes "
        "the strength slider. Typing here switches the preset to custom."
    ),
    "units": (
        "raw: 1 adds the vector as extracted. x residual norm: 1 adds as much as the residual "
        "stream's own norm at that layer (the same push on every layer)."
    ),
    "positions": (
        "Where the vector is added: every token, the prompt only (the model decides the style "
        "of its reply there: steers with the content kept), or the reply's own tokens."
    ),
    "last_n": "With 'prompt': only its last n tokens (1 = the last prompt token); 0 = all of it.",
    "system_prompt": "Sent as the system turn of every message (empty: none).",
    "temperature": "0 = greedy (the same reply every time); higher samples more freely.",
    "max_tokens": "The longest reply, in tokens.",
    "seed": "The sampling seed (with temperature > 0): the same seed gives the same reply.",
    "side_by_side": "Also the plain reply to the same conversation, from the same batch.",
    "prompted": (
        "Also the reply under the persona's own system prompt: steering judged against "
        "simply asking for the persona."
    ),
    "neuron_sets": (
        "Stored persona neurons (MLP units) to ablate. attribution: activation x gradient; "
        "patching: attribution patching at the prompt; exact: each unit patched for real at "
        "the last prompt token (works best on the demo model)."
    ),
    "neurons": "Typed units, layer:index, e.g. '1:12, 1:40-45'.",
    "ablation": (
        "off; zero: set the units to 0; mean: set them to the baseline persona's mean there "
        "(removes the persona's push and nothing else)."
    ),
    "ablation_positions": (
        "Where the units are ablated. Sets found by patching act where they were found: "
        "patching sets over the prompt, exact sets at the last prompt token."
    ),
    "direction": "A persona whose direction is removed from the residual stream.",
    "direction_from": (
        "Which stored vector gives the direction: the last prompt token's works on the demo "
        "model (the reply's style is decided there)."
    ),
    "direction_layers": "'all', or layers and ranges, e.g. '0-2, 5'.",
    "direction_mode": (
        "To the baseline's level: the component along the direction moves to where the "
        "baseline persona has it (removes the persona's push). To zero: projected out "
        "(moves as far as the persona does where the baseline sits far from zero)."
    ),
    "direction_positions": "Where the direction is ablated.",
    "dataset": "A built-in set of personas and questions (demo: the demo model's own corpus).",
    "extract_positions": (
        "Where each vector is averaged: question_span (the user turn and the assistant "
        "header), prompt_last (the last prompt token), prompt_avg, response_avg (the reply)."
    ),
    "extract_personas": "Only these personas (and the baseline): quicker. Empty: all of them.",
    "extract_neurons": "Also score MLP units for each persona pair (attribution patching).",
    "vector_persona": "Whose stored vector to write as a file.",
    "vector_kind": "Which kind of that persona's vectors (where it was read from).",
    "vector_format": ".safetensors: every layer with its metadata; .gguf: a llama.cpp control "
    "vector (layers 1 on).",
    "analysis_personas": "Only these personas (at least 2): quicker. Empty: all of the dataset's.",
    "cap": (
        "Keep the projection on this direction on one side of a level. The assistant axis "
        "(from the role personas toward the default assistant) holds the assistant; a persona's "
        "vector keeps that persona in check."
    ),
    "cap_side": (
        "At least the level: the projection is raised where it falls below (holds the "
        "assistant on its axis). At most: lowered where it rises above (caps a persona)."
    ),
    "cap_by": (
        "Percentile: of the vector's reference (a persona vector's baseline samples, the "
        "assistant axis' default-assistant samples), per layer. Threshold: a raw projection."
    ),
    "cap_level": "The percentile (0-100) or the raw threshold.",
    "cap_layers": "'all', or layers and ranges, e.g. '0-2, 5'.",
    "cap_positions": (
        "Where it is held. The last prompt token decides the reply's persona on the demo model."
    ),
    "axis": (
        "Read from the dataset the extraction box offers (demo: the demo corpus), at the last "
        "prompt token: neutral personas' mean minus the role personas' mean, per layer."
    ),
    "view_layer": "The layer whose projections colour the tokens.",
    "view_persona": "Whose projection the tokens and the heatmap show.",
}

GLOSSARY = """
- **Persona vector**: the difference between the mean residual stream of a persona's replies
  and a baseline persona's (here `default`, no system prompt), one per layer.
- **Residual stream**: the running sum each layer reads from and writes to; *layer i* is the
  output of decoder block i.
- **Read from** (positions kind): where the vector was averaged. *question_span*: the user turn
  and the assistant header; *prompt_last*: the last prompt token; *response_avg*: the reply.
- **Band**: the persona's best layer (highest AUC) and 2 layers either side of it.
- **x residual norm**: strength in multiples of the residual stream's mean norm at that layer.
- **Add at prompt**: the vector is added at the prompt's tokens only; the reply follows the
  style its first token takes. **Last n**: only the prompt's last n tokens.
- **AUC / separation**: how well the projection on a vector tells the persona's replies from
  the baseline's (1 = perfectly; separation in pooled standard deviations).
- **Persona neurons**: MLP units that separate a persona from its baseline. *attribution*:
  activation x gradient; *patching*: attribution patching (a first-order estimate) at the
  prompt; *exact*: each unit really patched at the last prompt token, then a small set chosen.
- **Mean vs zero ablation**: set units (or a direction) to the baseline's mean, which removes
  only the persona's push, or to zero, which can push as far the other way.
- **Prompted baseline**: the same question under the persona's own system prompt, the usual
  bar steering is judged against.
- **Projection**: a token's residual stream along the unit persona vector; scaled, 0 is the
  baseline's mean and 1 the persona's own.
- **Percentile**: where a projection ranks among the vector's reference samples at that layer
  (a persona vector's baseline, the assistant axis' default assistant); 50 is typical.
- **Assistant axis**: the direction from the role personas toward the default assistant.
- **Drift**: each assistant turn's projection, pooled the way the vector was read, turn by turn.
- **Hold (cap)**: keep a projection on one side of a level; positions already there are left
  exactly as they were.
"""
