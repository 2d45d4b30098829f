"""The real repositories' configs, transcribed from /work/shared/reference/real-layout.md (huggingface.co and exact
copies): what the tiny set keeps the keys of and the full-size set equals."""

REAL_LLAMA_CONFIG = {
    "_name_or_path": "/raid/aryan/llava-llama-3-8b-v1_1-extracted/text_encoder", "architectures": ["LlamaModel"],
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.48.0.dev0", "use_cache": True, "vocab_size": 128320,
}
REAL_CLIP_CONFIG = {
    "_name_or_path": "/raid/aryan/llava-llama-3-8b-v1_1-extracted/text_encoder_2",
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "torch_dtype": "float16", "transformers_version": "4.48.0.dev0", "vocab_size": 49408,
}
REAL_VAE_CONFIG = {
    "_class_name": "AutoencoderKLHunyuanVideo", "_diffusers_version": "0.32.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["HunyuanVideoDownBlock3D"] * 4,
    "in_channels": 3, "latent_channels": 16, "layers_per_block": 2, "mid_block_add_attention": True,
    "norm_num_groups": 32, "out_channels": 3, "scaling_factor": 0.476986, "spatial_compression_ratio": 8,
    "temporal_compression_ratio": 4, "up_block_types": ["HunyuanVideoUpBlock3D"] * 4,
}
REAL_PREPROCESSOR_CONFIG = {
    "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}
REAL_SIGLIP_CONFIG = {
    "_name_or_path": "/home/lvmin/.cache/huggingface/hub/models--black-forest-labs--FLUX.1-Redux-dev/snapshots/"
                     "1282f955f706b5240161278f2ef261d2a29ad649/image_encoder",
    "architectures": ["SiglipVisionModel"], "attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 1152, "image_size": 384, "intermediate_size": 4304, "layer_norm_eps": 1e-06,
    "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 27,
    "patch_size": 14, "torch_dtype": "bfloat16", "transformers_version": "4.46.2",
}
REAL_TRANSFORMER_CONFIG = {
    "_class_name": "HunyuanVideoTransformer3DModelPacked", "_diffusers_version": "0.33.0.dev0",
    "_name_or_path": "hunyuanvideo-community/HunyuanVideo", "attention_head_dim": 128, "guidance_embeds": True,
    "has_clean_x_embedder": True, "has_image_proj": True, "image_proj_dim": 1152, "in_channels": 16,
    "mlp_ratio": 4.0, "num_attention_heads": 24, "num_layers": 20, "num_refiner_layers": 2,
    "num_single_layers": 40, "out_channels": 16, "patch_size": 2, "patch_size_t": 1,
    "pooled_projection_dim": 768, "qk_norm": "rms_norm", "rope_axes_dim": [16, 56, 56], "rope_theta": 256.0,
    "text_embed_dim": 4096,
}
REAL_LLAMA_TOKENIZER_CONFIG_KEYS = {
    "add_bos_token", "add_eos_token", "add_prefix_space", "added_tokens_decoder", "bos_token", "chat_template",
    "clean_up_tokenization_spaces", "eos_token", "extra_special_tokens", "legacy", "model_input_names",
    "model_max_length", "pad_token", "padding_side", "processor_class", "tokenizer_class", "unk_token",
    "use_default_system_prompt",
}
REAL_CLIP_TOKENIZER_CONFIG_KEYS = {
    "add_prefix_space", "added_tokens_decoder", "bos_token", "clean_up_tokenization_spaces", "do_lower_case",
    "eos_token", "errors", "extra_special_tokens", "model_max_length", "pad_token", "tokenizer_class", "unk_token",
}
REAL_HY_MODEL_INDEX = {
    "_class_name": "HunyuanVideoPipeline", "_diffusers_version": "0.32.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "LlamaModel"],
    "text_encoder_2": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "LlamaTokenizerFast"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"], "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
}

# Weight files as huggingface.co lists them (GB as it rounds them); the text encoder's index total_size is exact.
REAL_WEIGHT_FILE_GB = {
    "text_encoder": {"model-00001-of-00004.safetensors": 4.98, "model-00002-of-00004.safetensors": 5.0,
                     "model-00003-of-00004.safetensors": 4.92, "model-00004-of-00004.safetensors": 0.117},
    "text_encoder_2": {"model.safetensors": 0.246},
    "vae": {"diffusion_pytorch_model.safetensors": 0.986},
    "image_encoder": {"model.safetensors": 0.857},  # inferred in real-layout.md: 428 M params in bf16
    # FramePackI2V_HY's sizes; F1 has the same file names and architecture
    "transformer": {"diffusion_pytorch_model-00001-of-00003.safetensors": 9.97,
                    "diffusion_pytorch_model-00002-of-00003.safetensors": 9.99,
                    "diffusion_pytorch_model-00003-of-00003.safetensors": 5.79},
}
REAL_TEXT_ENCODER_TOTAL_SIZE = 15_010_373_632
