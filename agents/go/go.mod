module presenced.dev/agent

go 1.19
