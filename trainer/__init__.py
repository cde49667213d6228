"""The bundled LoRA trainer: JSONL data in, a served PEFT adapter out (`loraserve trainer`, `make demo`)."""
