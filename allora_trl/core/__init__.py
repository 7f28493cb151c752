"""The ALLoRA method on peft (no TRL): the gradient rule, the LoRA variant that runs it inside each layer, installing
and saving it on a peft model, its statistics, the optional update scaling and the distributed start-up checks."""
