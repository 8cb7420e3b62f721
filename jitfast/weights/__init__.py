"""JiT weights in every published layout: key maps and their detection (layouts), config.json
fields (configs), pickle-free files and folders (files), model folders and the Hub (pretrained).
``jitfast.load_checkpoint`` reads them all; ``python -m jitfast.convert`` writes them."""
