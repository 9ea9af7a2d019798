"""`python -m proxy.sim`: a simulated Ollama to try the proxy against."""

from proxy.sim.simulator import main

if __name__ == "__main__":
    main()
