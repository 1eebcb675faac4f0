"""The YAML presets shipped with longctx (this directory is installed as the package `longctx.preset_files`)."""
