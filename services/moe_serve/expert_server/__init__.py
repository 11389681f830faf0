"""An expert server (`moe-expert-server`): owns routed experts on its devices and serves RunExperts."""
