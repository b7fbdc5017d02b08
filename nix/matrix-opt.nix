# The daemon image's /opt/matrix: the MCP servers, the skill corpus and the agent manifests.
#
# The pinned nixpkgs (8fd9daa3db09ced9700431c5b7ad0e8ba199b575) could not be fetched here;
# each call was checked against the source at the revision named beside it.
# - `runCommand name env script`: pkgs/build-support/trivial-builders.
#
# The image links /opt/matrix to this output. Layout (the agent manifests name these paths):
#   mcp/npm/node_modules/.bin/mcp-server-{filesystem,memory,sequential-thinking}
#   mcp/python/bin/mcp-server-{fetch,git,time}
#   skills/*.md
#   agents/*.json
{runCommand}: {
  # The npm MCP servers (the `mcp-npm-servers` package); no default.
  npmServers,
  # The Python MCP servers (the `mcp-python-servers` package); no default.
  pythonServers,
  # The skill corpus; default: deploy/daemon/skills.
  skills ? ../deploy/daemon/skills,
  # The agent manifests; default: deploy/daemon/agents.
  agents ? ../deploy/daemon/agents,
}:
runCommand "matrix-opt" {} ''
  mkdir -p $out/mcp
  # The servers stay in their own store paths: their scripts name those paths.
  ln -s ${npmServers} $out/mcp/npm
  ln -s ${pythonServers} $out/mcp/python
  cp -R ${skills} $out/skills
  cp -R ${agents} $out/agents
''
