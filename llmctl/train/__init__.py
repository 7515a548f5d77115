"""One trainer for every stage (pretrain, finetune, qlora): loop, optimizer, data windows,
checkpoints, precision, throughput accounting and multi-process launch."""
