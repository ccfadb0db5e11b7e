"""Split files, long-tailed profiles, loaders (DALI or torchvision), sampling, mixup."""
