"""What a checkpoint is: config.json -> ModelSpec, the lazy safetensors reader, tensor names and shapes,
loading the dense part and experts, expert placement, synthetic checkpoints, the tokenizer. Imports core."""
