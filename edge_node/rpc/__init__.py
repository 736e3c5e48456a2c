"""Generated gRPC and protobuf modules (`make proto` from proto/*.proto); do not edit by hand."""
