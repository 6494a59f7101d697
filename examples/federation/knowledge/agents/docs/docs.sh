note=$(cat)
echo "known-issues.md updated: ${note#bug fixed: }"
