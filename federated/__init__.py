"""edgefed: federated LoRA rounds on Flower (flwr 1.41, Message API).

aggregation.py  pure: FedAvg over A and B, FFA-LoRA, HetLoRA; validation of updates (reject + log)
compass.py      pure: FedCompass steps per client from measured speed, group deadlines
plan.py         pure: per-device base quantization (memory) and rank (speed), FedPipe-style
data.py         token blocks and batches from texts passed in (the corpus is read by the command line)
models.py       LoRA configs, the initial global adapter, peft models, adapter tensors in and out
train.py        local training steps and held-out perplexity
task.py         a client's round without Flower types
client_app.py   the ClientApp (thin), with Flower's client-side DP clipping switch
strategy.py     the server's round loop over Flower's Grid: deadlines, late updates, checkpoints, resume
server_app.py   the ServerApp (thin)
checkpoint.py   the global adapter per round in PEFT format
runner.py       SuperLink / SuperNode / `flwr run` processes (the seam the device agent calls)
warm.py         the SuperNode's ClientApp as one long-lived process serving every message (the base stays loaded)
wire.py         the adapter on the wire: one flat array and its layout (one Flower object per message)
"""
