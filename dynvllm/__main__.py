from dynvllm.cli import main

main()
