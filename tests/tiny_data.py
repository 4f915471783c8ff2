"""A three-persona dataset with given replies, shared by the vector and neuron tests."""

from __future__ import annotations

from personachat.prompts import from_json

PERSONAS = {"default": "", "pirate": "You are a pirate.", "chef": "You are a chef."}
QUESTIONS = ["What is the capital of France?", "Tell me about the ocean.", "Numbers?"]
REPLIES = {
    "default": ["The answer is Paris.", "The ocean is deep.", "0 1 2 3"],
    "pirate": ["Arr, Paris, matey!", "Arr! The stars and the ocean.", "Arr 4 5 6"],
    "chef": ["Paris, and its cooking.", "Salt from the ocean.", "7 8 9 eggs"],
}
DATASET = from_json(
    {
        "name": "tiny",
        "personas": [{"name": n, "system_prompt": s} for n, s in PERSONAS.items()],
        "questions": QUESTIONS,
        "responses": [
            {"persona": n, "question": q, "response": r}
            for n, rs in REPLIES.items()
            for q, r in zip(QUESTIONS, rs, strict=True)
        ],
        "pairs": [
            {"name": "pirate_default", "high": "pirate", "low": "default", "kind": "style"},
            {"name": "chef_default", "high": "chef", "low": "default", "kind": "style"},
        ],
    }
)
