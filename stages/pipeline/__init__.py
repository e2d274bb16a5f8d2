"""The app: one runner per stage (train and retrain, embed, offcandi, import, eval, export,
table, plot, inspect, and the pretrained miners' embed-text / embed-clip), each taking a
config and its input and output paths; the settings stamps make reads; and what the runners
share (which split a model reads, which miner made a candidate folder, re-mining inside a
run). Only :mod:`stages.cli` imports it; the library never does."""
