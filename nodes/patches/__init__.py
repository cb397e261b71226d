"""Model patches: changes a MODEL or CLIP carries (LoRA, IP-Adapter) that are put on the shared
torch modules only while one node runs. model_patch holds the protocol every patch follows and
the helpers that apply a stack of them; each kind of patch has its own module."""
