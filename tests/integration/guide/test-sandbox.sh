#!/bin/bash
set -e

IMAGE=${1:-stigmer-sandbox-basic:local}

echo "Testing sandbox image: $IMAGE"

# Test Python
echo "✓ Testing Python..."
docker run --rm $IMAGE python --version

# Test Node
echo "✓ Testing Node..."
docker run --rm $IMAGE node --version

# Test Git
echo "✓ Testing Git..."
docker run --rm $IMAGE git --version

# Test Python packages
echo "✓ Testing Python packages..."
docker run --rm $IMAGE python -c "import yaml, requests, click"

# Test file operations
echo "✓ Testing file operations..."
docker run --rm $IMAGE bash -c "echo 'test' > /tmp/test.txt && cat /tmp/test.txt"

echo "✅ All tests passed!"
