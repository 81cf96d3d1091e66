"""Data: SynthCXR, TFDS builders, sources, tokenizers and Grain pipelines.

Submodules are imported on demand (tensorflow_datasets is slow to import):
  synth_cxr   the SynthCXR structural causal model (images, reports, labels)
  sources     get_source(data_cfg, split): random-access examples (SynthCXR or ArrayRecord)
  tokenizer   get_tokenizer(data_cfg): local HF tokenizer or a deterministic WordPiece
  pipeline    make_loader(...): checkpointable Grain iterator of batches
  sampling    label_fraction_indices(labels, n, seed): nested label-stratified subsets
  show        show(data_cfg, out_path): a PNG grid of films, impressions and labels
  bench       bench_data(data_cfg, batch_size): loader throughput
  builders    TFDS builders by dataset name
"""
