#compdef gpubroker

_gpubroker_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _GPUBROKER_COMPLETE=complete_zsh gpubroker)
}

compdef _gpubroker_completion gpubroker
