"""One module per subcommand: flags -> a frozen configuration -> a package function -> output."""

COMMANDS = ("generate", "shard", "tp_generate", "prefill", "build_demo_model", "quantize", "import_gguf", "certs",
            "serve", "node", "coordinator", "deploy")
COMMANDS += ("train_exits", "cloud_serve")  # early exit with a cloud tier
COMMANDS += ("fl",)  # federated LoRA rounds on Flower
COMMANDS += ("testbed",)  # emulated fleet: scenario TOML -> namespaces, caps, faults -> report
