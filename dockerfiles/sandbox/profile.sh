# shellcheck shell=sh
# Installed as /etc/profile.d/stigmer-sandbox.sh: /etc/profile resets PATH
# for login shells (bash -l); put the sandbox's Python venv and Node.js back
# in front.
case ":${PATH}:" in
    *:/opt/venv/bin:*) ;;
    *) PATH="/opt/venv/bin:/opt/node/bin:${PATH}" ;;
esac
export PATH
