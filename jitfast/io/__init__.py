"""Reading and writing models and images: checkpoints (the official layout), weight-file layouts
(official, diffusers), configs, the Hub, PNG grids."""
