"""The models evaluated: real pretrained ones by short name, the Gemma tokenizer fix, the toy models and their training."""
