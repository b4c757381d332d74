"""The Ray Train ranks (DeepSpeed), their channel and feeder, and the coordinator's handle on them."""
