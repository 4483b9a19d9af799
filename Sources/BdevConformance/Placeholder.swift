import Env
