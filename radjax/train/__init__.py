"""The training loop (loop.train), its state (state), optimiser (optim), checkpoints
(checkpoint, incl. load_pretrained) and metric sinks (metrics). Import the submodules."""
